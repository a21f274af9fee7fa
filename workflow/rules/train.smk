# placeholder until the train rule lands
